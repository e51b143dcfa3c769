//! `--log`: the programs' aya-log records, printed to stdout (one line each) until Ctrl-C.
//! Records are written only while `CFG_LOG` is set in the configuration (this run set it); on
//! the way out it is cleared again. The links are pinned, so stopping here leaves the programs
//! attached.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use super::attach::{self, Loaded};

/// The cause is part of each message (and not a `source`, which would print it twice).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("--log: cannot read the programs' log buffer: {0}")]
    Logger(aya_log::Error),
    #[error("--log: cannot install the Ctrl-C handler: {0}")]
    Signal(nix::Error),
    #[error("--log: turning the debug records off again: {0}")]
    Off(attach::AttachError),
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn stop(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Prints each record as one line on stdout (to be piped or grepped), whatever the global
/// logger of the binary is.
struct Stderr;

impl ::log::Log for Stderr {
    fn enabled(&self, _: &::log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &::log::Record<'_>) {
        println!("[{} {}] {}", record.level(), record.target(), record.args());
    }
    fn flush(&self) {}
}

pub fn follow(loaded: &mut Loaded) -> Result<(), LogError> {
    // The attached set's log buffer: this run's, or the previous run's if its programs were kept.
    let mut logger =
        aya_log::EbpfLogger::init_from_id_with_logger(loaded.attached_program, Stderr).map_err(LogError::Logger)?;
    let action = SigAction::new(SigHandler::Handler(stop), SaFlags::empty(), SigSet::empty());
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        sigaction(Signal::SIGINT, &action).map_err(LogError::Signal)?;
        sigaction(Signal::SIGTERM, &action).map_err(LogError::Signal)?;
    }
    eprintln!("mesh-init ebpf: printing the programs' debug log; Ctrl-C stops (the programs stay attached)");
    while !STOP.load(Ordering::Relaxed) {
        logger.flush();
        std::thread::sleep(Duration::from_millis(100));
    }
    logger.flush();
    attach::set_log(&mut loaded.ebpf, false).map_err(LogError::Off)?;
    Ok(())
}
