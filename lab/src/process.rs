//! Processes: long-running children (servers, proxies, `mesh-init ebpf --log`) as guards, and
//! commands run to completion within a time limit.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        mpsc::{self, Receiver, RecvTimeoutError},
        Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::interrupt;

/// How long [`check`] lets a command run: far above what any test's command takes, so it only
/// turns a hang into a failure that names the command.
pub const CHECK_LIMIT: Duration = Duration::from_secs(120);

/// How long [`Proc::wait_for_line`] waits for its line: servers print "ready" within a second,
/// so this only turns a hang into a failure that names the marker.
pub const LINE_LIMIT: Duration = Duration::from_secs(60);

/// Runs `cmd` to completion and returns what it printed, whatever its exit status. Fails when it
/// cannot start, runs longer than `limit` or an interruption is requested ([`interrupt`]); it is
/// killed then. stdin is null; stdout and stderr are read on threads, so a full pipe never
/// blocks the child.
pub fn output(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let read_all = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = read_all(child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let stderr = read_all(child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait().with_context(|| format!("waiting for {cmd:?}"))? {
            break status;
        }
        let why = if interrupt::requested() {
            "interrupted"
        } else if Instant::now() > deadline {
            "did not finish in time"
        } else {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
            continue;
        };
        let _ = child.kill();
        let _ = child.wait();
        bail!("{cmd:?}: {why} (limit {limit:?})");
    };
    Ok(Output { status, stdout: stdout.join().unwrap_or_default(), stderr: stderr.join().unwrap_or_default() })
}

/// Like [`output`], and a non-zero exit is an error quoting stdout and stderr.
pub fn run(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let out = output(cmd, limit)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim_end(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(out)
}

/// [`run`] for tests: within [`CHECK_LIMIT`], panicking with the command and its output.
#[track_caller]
pub fn check(cmd: &mut Command) -> Output {
    match run(cmd, CHECK_LIMIT) {
        Ok(out) => out,
        Err(e) => panic!("{e:#}"),
    }
}

/// A long-running child, killed (and reaped) on drop.
pub struct Proc {
    child: Child,
    /// What it is, for messages: a name given by the caller, or the command line.
    pub name: String,
    /// Its stdout lines, read on a thread as they come ([`Proc::spawn`]). In a mutex only so that
    /// a `Proc` can be shared with the threads a test runs in a namespace.
    lines: Option<Mutex<Receiver<String>>>,
    /// The file its stdout and stderr go to ([`Proc::spawn_logged`]), quoted when it exits early.
    log: Option<PathBuf>,
}

impl Proc {
    /// Starts `cmd` with stdin null and stdout read line by line for [`Proc::wait_for_line`]
    /// (drained continuously, so a chatty child never blocks on a full pipe); stderr is
    /// inherited so that it shows in the test's output. Panics when it cannot start.
    pub fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut out = BufReader::new(stdout);
            let mut line = Vec::new();
            while out.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                if tx.send(String::from_utf8_lossy(&line).into_owned()).is_err() {
                    return;
                }
                line.clear();
            }
        });
        Proc { child, name: format!("{cmd:?}"), lines: Some(Mutex::new(rx)), log: None }
    }

    /// Starts `cmd` with stdin null and stdout and stderr appended to `log` (a server that
    /// prints a lot for a long time: the bench's sidecars). Panics when it cannot start.
    pub fn spawn_logged(name: &str, cmd: &mut Command, log: &Path) -> Proc {
        let file = fs::File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = file.try_clone().unwrap_or_else(|e| panic!("dup {}: {e}", log.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc { child, name: name.to_string(), lines: None, log: Some(log.to_path_buf()) }
    }

    /// The child's PID (the program's own: [`crate::Netns::command`] execs).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to [`LINE_LIMIT`] for a stdout line containing `marker` (e.g. "ready") and
    /// returns it; earlier lines are consumed. Panics when the process exits first or time runs
    /// out. Only for [`Proc::spawn`]ed processes.
    #[track_caller]
    pub fn wait_for_line(&mut self, marker: &str) -> String {
        let lines = self.lines.as_mut().expect("wait_for_line needs a Proc::spawn'ed process");
        let lines = lines.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        let deadline = Instant::now() + LINE_LIMIT;
        loop {
            match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains(marker) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("{} exited before printing {marker:?} ({:?})", self.name, self.child.try_wait())
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{} did not print {marker:?} within {LINE_LIMIT:?}", self.name)
                }
            }
        }
    }

    /// The exit status once it has exited, None while it runs.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Fails when the process has exited, quoting the end of its log: why a server stopped
    /// answering is usually its last words.
    pub fn ensure_running(&mut self) -> Result<()> {
        let Some(status) = self.exit_status() else { return Ok(()) };
        let mut text = String::new();
        if let Some(log) = &self.log {
            if let Ok(mut f) = fs::File::open(log) {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                let _ = f.seek(SeekFrom::Start(len.saturating_sub(2000)));
                let _ = f.read_to_string(&mut text);
            }
            bail!("{} exited ({status}); its log {} ends with:\n{}", self.name, log.display(), text.trim());
        }
        bail!("{} exited ({status})", self.name);
    }

    /// Sends `sig` (SIGHUP to reload, SIGTERM to drain, SIGINT as Ctrl-C would).
    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Sends `sig` and waits up to `timeout` for the exit status (None: still running).
    pub fn signal_and_wait(&mut self, sig: Signal, timeout: Duration) -> Option<ExitStatus> {
        self.signal(sig);
        crate::try_wait_until(timeout, "exit", || Ok(self.exit_status())).ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
