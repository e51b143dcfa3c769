//! `--log`: the programs' aya-log records, printed to stdout (one line each) until Ctrl-C.
//!
//! Records are written only while `CONTROL_LOG_UNTIL` lies in the future: a lease that this
//! loop renews every second for the next [`LEASE`], and clears on Ctrl-C. A reader that is
//! killed (SIGKILL, OOM) cannot clear it, and does not need to: the lease runs out and the
//! programs stop writing records nobody reads. The links are pinned, so stopping here leaves
//! the programs attached.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use super::attach::{self, Loaded};

/// How long records go on after the reader's last renewal.
pub const LEASE: Duration = Duration::from_secs(3);
const RENEW: Duration = Duration::from_secs(1);

/// The cause is part of each message (and not a `source`, which would print it twice).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("--log: cannot read the programs' log buffer: {0}")]
    Logger(aya_log::Error),
    #[error("--log: cannot install the Ctrl-C handler: {0}")]
    Signal(nix::Error),
    #[error("--log: switching the debug records on or off: {0}")]
    Lease(attach::AttachError),
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn stop(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Prints each record as one line on stdout (to be piped or grepped), whatever the global
/// logger of the binary is. A reader that went away is not an error worth a panic.
struct Stdout;

impl ::log::Log for Stdout {
    fn enabled(&self, _: &::log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &::log::Record<'_>) {
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), "[{} {}] {}", record.level(), record.target(), record.args());
    }
    fn flush(&self) {}
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn follow(loaded: &mut Loaded) -> Result<(), LogError> {
    // The attached set's log buffer: this run's, or the previous run's if its programs were kept.
    let mut logger =
        aya_log::EbpfLogger::init_from_id_with_logger(loaded.attached_program, Stdout).map_err(LogError::Logger)?;
    let action = SigAction::new(SigHandler::Handler(stop), SaFlags::empty(), SigSet::empty());
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        sigaction(Signal::SIGINT, &action).map_err(LogError::Signal)?;
        sigaction(Signal::SIGTERM, &action).map_err(LogError::Signal)?;
    }
    eprintln!("mesh-init ebpf: printing the programs' debug log; Ctrl-C stops (the programs stay attached)");
    let mut renewed: Option<Instant> = None;
    while !STOP.load(Ordering::Relaxed) {
        if renewed.is_none_or(|at| at.elapsed() >= RENEW) {
            let until = monotonic_ns() + LEASE.as_nanos() as u64;
            attach::set_log_lease(&mut loaded.ebpf, until).map_err(LogError::Lease)?;
            renewed = Some(Instant::now());
        }
        logger.flush();
        std::thread::sleep(Duration::from_millis(100));
    }
    logger.flush();
    attach::set_log_lease(&mut loaded.ebpf, 0).map_err(LogError::Lease)?;
    Ok(())
}
