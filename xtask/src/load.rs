//! Load generators: wrk and iperf3 (Debian's), and two small clients of our own that Debian does
//! not have: a fixed-rate (open-loop) HTTP client and an idle-connection holder. Ours run as
//! `xtask load-rate` / `xtask load-idle` child processes, so they can be placed in a pod's
//! namespace and cgroup exactly like wrk (the eBPF interception applies per cgroup).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::network::Pod;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// What a wrk run measured.
#[derive(Debug, Clone)]
pub struct WrkResult {
    pub requests: u64,
    pub rps: f64,
    pub latency: Percentiles,
    /// Socket errors plus non-2xx/3xx responses.
    pub errors: u64,
}

/// `wrk -t1 -cN -dD --latency` against the backend as seen from the pod; `close` adds
/// `Connection: close`, so every request opens a new connection.
pub fn wrk(pod: &Pod, conns: u32, duration: Duration, close: bool) -> Result<WrkResult> {
    let mut cmd = pod.command("wrk");
    cmd.args([
        "-t1",
        &format!("-c{conns}"),
        &format!("-d{}s", duration.as_secs().max(1)),
        "--latency",
        "--timeout",
        "5s",
    ]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{}/", pod.backend));
    let out = mesh_lab::run(&mut cmd, duration + Duration::from_secs(30))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    parse_wrk(&stdout).with_context(|| format!("unexpected wrk output:\n{stdout}"))
}

/// What h2load reports.
#[derive(Debug, Clone)]
pub struct H2Result {
    pub requests: u64,
    pub rps: f64,
    /// Requests that did not succeed, plus responses other than 2xx.
    pub errors: u64,
}

/// `h2load -c1 -m100` for `duration` against the backend from the pod: HTTP/2 with prior
/// knowledge (h2c), one connection carrying 100 concurrent streams. h2load reports throughput
/// and mean latency only, so the table has no percentiles.
pub fn h2load(pod: &Pod, duration: Duration) -> Result<H2Result> {
    let mut cmd = pod.command("h2load");
    cmd.args(["-t1", "-c1", "-m100", &format!("-D{}", duration.as_secs().max(1))])
        .arg(format!("http://{}/", pod.backend));
    let out = mesh_lab::run(&mut cmd, duration + Duration::from_secs(30))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    parse_h2load(&stdout).with_context(|| format!("unexpected h2load output:\n{stdout}"))
}

fn parse_h2load(text: &str) -> Result<H2Result> {
    let (mut rps, mut requests, mut errors, mut ok_2xx) = (None, None, 0, None);
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().map(|w| w.trim_end_matches(',')).collect();
        match words.as_slice() {
            // "finished in 1.00s, 8123.45 req/s, 1.2MB/s"
            ["finished", "in", _, r, "req/s", ..] => rps = Some(r.parse::<f64>()?),
            // "requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, 0 errored, 0 timeout"
            ["requests:", _, "total", _, "started", done, "done", ok, "succeeded", ..] => {
                let (done, ok) = (done.parse::<u64>()?, ok.parse::<u64>()?);
                requests = Some(done);
                errors += done - ok.min(done);
            }
            // "status codes: 100 2xx, 0 3xx, 0 4xx, 0 5xx"
            ["status", "codes:", n, "2xx", ..] => ok_2xx = Some(n.parse::<u64>()?),
            _ => {}
        }
    }
    let (rps, requests, ok_2xx) = (
        rps.context("no \"finished in\" line")?,
        requests.context("no \"requests:\" line")?,
        ok_2xx.context("no \"status codes:\" line")?,
    );
    anyhow::ensure!(requests > 0, "h2load completed no request");
    Ok(H2Result { requests, rps, errors: errors.max(requests.saturating_sub(ok_2xx)) })
}

fn parse_wrk(text: &str) -> Result<WrkResult> {
    let mut r = WrkResult { requests: 0, rps: 0.0, latency: Percentiles::default(), errors: 0 };
    let mut seen = 0;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => (r.latency.p50, seen) = (wrk_duration_us(v)?, seen + 1),
            ["90%", v] => (r.latency.p90, seen) = (wrk_duration_us(v)?, seen + 1),
            ["99%", v] => (r.latency.p99, seen) = (wrk_duration_us(v)?, seen + 1),
            ["Requests/sec:", v] => (r.rps, seen) = (v.parse()?, seen + 1),
            [n, "requests", "in", ..] => r.requests = n.parse()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>()?,
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                for n in rest.iter().skip(1).step_by(2) {
                    r.errors += n.trim_end_matches(',').parse::<u64>()?;
                }
            }
            _ => {}
        }
    }
    if seen != 4 {
        bail!("missing Requests/sec or latency distribution");
    }
    Ok(r)
}

/// wrk prints durations as `812.00us`, `1.23ms`, `2.00s`.
fn wrk_duration_us(v: &str) -> Result<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        bail!("unknown duration {v:?}");
    };
    Ok(num.parse::<f64>()? * scale)
}

/// iperf3 from the pod to the backend's iperf3 server: received bits per second.
pub fn iperf3(pod: &Pod, duration: Duration) -> Result<f64> {
    let mut cmd = pod.command("iperf3");
    cmd.args(["-c", &pod.backend.to_string(), "-p", "5201", "-J", "-t", &duration.as_secs().max(1).to_string()]);
    // Not `run`: iperf3 explains a failure in its JSON, which is more telling than its status.
    let out = mesh_lab::output(&mut cmd, duration + Duration::from_secs(30))?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr).trim()))?;
    if let Some(err) = json.get("error") {
        bail!("iperf3: {err}");
    }
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON without end.sum_received.bits_per_second")
}

// ---------------------------------------------------------------------------------------------
// Fixed rate
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, clap::Args)]
pub struct RateArgs {
    /// Where to send `GET /` (the client dials this; interception may redirect it).
    #[arg(long)]
    pub addr: SocketAddr,
    /// Requests per second, in total.
    #[arg(long)]
    pub rate: u32,
    #[arg(long, value_parser = crate::parse_secs)]
    pub duration: Duration,
    /// Keep-alive connections, each with its own share of the schedule.
    #[arg(long, default_value = "4")]
    pub conns: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RateResult {
    pub sent: u64,
    pub errors: u64,
    pub latency: Percentiles,
}

/// The open-loop client, wrk2's model: connection k sends request i at `start + (i*conns + k) /
/// rate`, whatever happened before, and a latency is measured from that *intended* time, so a
/// stall is charged to every request it delays (no coordinated omission). Plain threads with
/// 1 ns timer slack instead of an async runtime: tokio's timer wheel has 1 ms granularity, ten
/// times the latency differences this workload exists to see.
pub fn rate_client(args: &RateArgs) -> Result<RateResult> {
    let conns = args.conns.max(1);
    let period = Duration::from_secs_f64(conns as f64 / args.rate as f64);
    let per_conn = (args.duration.as_secs_f64() / period.as_secs_f64()).ceil() as u64;
    let barrier = Arc::new(Barrier::new(conns as usize));
    let start_at = Arc::new(std::sync::OnceLock::new());
    let workers: Vec<_> = (0..conns)
        .map(|k| {
            let (addr, barrier, start_at) = (args.addr, barrier.clone(), start_at.clone());
            let rate = args.rate;
            std::thread::spawn(move || -> (Vec<u32>, u64) {
                // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
                unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
                // A failed connect is retried in the loop (and counted): returning before the
                // barrier would leave the other threads waiting for ever.
                let mut conn = HttpConn::connect(addr).ok();
                barrier.wait();
                let start: Instant = *start_at.get_or_init(|| Instant::now() + Duration::from_millis(50));
                let offset = Duration::from_secs_f64(k as f64 / rate as f64);
                let mut lat = Vec::with_capacity(per_conn as usize);
                let mut errors = 0;
                for i in 0..per_conn {
                    let intended = start + offset + period * i as u32;
                    if let Some(wait) = intended.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let ok = match conn.as_mut() {
                        Some(c) => c.get().is_ok_and(|status| status == 200),
                        None => false,
                    };
                    if ok {
                        lat.push(intended.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    } else {
                        errors += 1;
                        conn = HttpConn::connect(addr).ok();
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (lat, e) = w.join().map_err(|_| anyhow::anyhow!("rate client thread panicked"))?;
        all.extend(lat);
        errors += e;
    }
    all.sort_unstable();
    let pct = |q: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        all[((all.len() as f64 * q).ceil() as usize).clamp(1, all.len()) - 1] as f64
    };
    Ok(RateResult {
        sent: all.len() as u64 + errors,
        errors,
        latency: Percentiles { p50: pct(0.50), p90: pct(0.90), p99: pct(0.99) },
    })
}

/// A keep-alive HTTP/1.1 connection for `GET /` with small responses.
struct HttpConn {
    reader: BufReader<TcpStream>,
    request: Vec<u8>,
}

impl HttpConn {
    fn connect(addr: SocketAddr) -> Result<HttpConn> {
        let stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", addr.ip()).into_bytes();
        Ok(HttpConn { reader: BufReader::new(stream), request })
    }

    /// One request; returns the status once the whole response has been read.
    fn get(&mut self) -> Result<u16> {
        self.reader.get_mut().write_all(&self.request)?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line.split_whitespace().nth(1).context("no status line")?.parse()?;
        let mut length = 0usize;
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("connection closed in the headers");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((name, value)) = l.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse()?;
                }
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        Ok(status)
    }
}

/// Runs `xtask load-rate` in the pod and reads its JSON answer.
pub fn rate(pod: &Pod, rate: u32, duration: Duration) -> Result<RateResult> {
    let mut cmd = pod.command(std::env::current_exe()?);
    cmd.args(["load-rate", "--addr", &format!("{}:80", pod.backend), "--rate", &rate.to_string()])
        .args(["--duration", &format!("{}", duration.as_secs_f64())]);
    let out = mesh_lab::run(&mut cmd, duration + Duration::from_secs(30))?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

// ---------------------------------------------------------------------------------------------
// Idle connections
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, clap::Args)]
pub struct IdleArgs {
    #[arg(long)]
    pub addr: SocketAddr,
    #[arg(long)]
    pub count: u32,
    /// Give up opening more after this long.
    #[arg(long, value_parser = crate::parse_secs, default_value = "60")]
    pub open_within: Duration,
    /// Close everything after this long even if stdin stays open.
    #[arg(long, value_parser = crate::parse_secs, default_value = "60")]
    pub hold_at_most: Duration,
}

/// Opens `count` connections that send nothing, prints `held N failed M`, and keeps them until
/// stdin closes (the harness samples the proxy's memory meanwhile). Nothing is sent so that a
/// proxy holds one descriptor per connection (it dials upstream only for a request): with a
/// request each, HAProxy would need two per connection, more than the descriptor limit allows.
pub fn idle_client(args: &IdleArgs) -> Result<()> {
    const THREADS: u32 = 8;
    let deadline = Instant::now() + args.open_within;
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let n = args.count / THREADS + u32::from(t < args.count % THREADS);
            let addr = args.addr;
            std::thread::spawn(move || {
                let mut held = Vec::with_capacity(n as usize);
                let mut failed = 0u32;
                for _ in 0..n {
                    if Instant::now() > deadline {
                        failed += 1;
                        continue;
                    }
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                        Ok(c) => held.push(c),
                        Err(_) => failed += 1,
                    }
                }
                (held, failed)
            })
        })
        .collect();
    let mut held = Vec::new();
    let mut failed = 0;
    for w in workers {
        let (h, f) = w.join().map_err(|_| anyhow::anyhow!("idle client thread panicked"))?;
        held.extend(h);
        failed += f;
    }
    println!("held {} failed {failed}", held.len());
    std::io::stdout().flush()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(args.hold_at_most);
    drop(held);
    Ok(())
}

/// What the idle workload saw.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    pub held: u32,
    pub failed: u32,
}

/// Runs `xtask load-idle` in the pod; once it holds its connections, calls `sample` (which
/// reads the proxy's memory), then lets it close them.
pub fn idle<T>(pod: &Pod, count: u32, sample: impl FnOnce() -> Result<T>) -> Result<(Held, T)> {
    let mut cmd: Command = pod.command(std::env::current_exe()?);
    cmd.args(["load-idle", "--addr", &format!("{}:80", pod.backend), "--count", &count.to_string()]);
    let mut child =
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().context("start load-idle")?;
    let result = (|| {
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let w: Vec<&str> = line.split_whitespace().collect();
        let held = match w.as_slice() {
            ["held", h, "failed", f] => Held { held: h.parse()?, failed: f.parse()? },
            _ => bail!("load-idle said {line:?}"),
        };
        // Let the proxies finish the upstream side of the last connections.
        std::thread::sleep(Duration::from_millis(500));
        Ok((held, sample()?))
    })();
    drop(child.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(10);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_h2load_output() {
        let text = "starting benchmark...\nfinished in 1.00s, 8191.00 req/s, 1.02MB/s\n\
                    requests: 8200 total, 8300 started, 8200 done, 8190 succeeded, 10 failed, 0 errored, 0 timeout\n\
                    status codes: 8180 2xx, 0 3xx, 0 4xx, 10 5xx\n";
        let r = parse_h2load(text).unwrap();
        assert_eq!((r.requests, r.rps, r.errors), (8200, 8191.0, 20));
        assert!(parse_h2load("finished in 1.00s, 0.00 req/s, 0B/s\n").is_err());
    }

    #[test]
    fn parses_wrk_output() {
        let text = "Running 1s test @ http://10.200.1.2/\n  1 threads and 32 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   740.51us  209.38us   5.01ms   90.10%\n    Req/Sec    43.61k     1.21k   44.96k    81.82%\n  Latency Distribution\n     50%  707.00us\n     75%  779.00us\n     90%    1.23ms\n     99%    2.00s\n  47695 requests in 1.10s, 7.32MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 4\nRequests/sec:  43348.68\nTransfer/sec:      6.65MB\n";
        let r = parse_wrk(text).unwrap();
        assert_eq!(r.requests, 47695);
        assert_eq!(r.errors, 7);
        assert!((r.rps - 43348.68).abs() < 1e-6);
        assert_eq!((r.latency.p50, r.latency.p90, r.latency.p99), (707.0, 1230.0, 2_000_000.0));
    }
}
