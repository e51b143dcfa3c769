//! Ctrl-C and SIGTERM for long harness runs (the bench): the handler only records the request;
//! [`crate::output`] and [`crate::try_wait_until`] check it and fail, so the caller unwinds
//! through its guards and every `Drop` runs (the default action would end the process with
//! namespaces, cgroups and servers left behind). Tests do not install it.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Replaces the default action of SIGINT, SIGTERM and SIGHUP with recording the request.
pub fn install() -> Result<()> {
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe, and no other
        // handler of these signals is replaced behind anyone's back (the harness owns them).
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(())
}

/// Whether an interruption was requested.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Fails when an interruption was requested, so the caller unwinds through its guards.
pub fn check() -> Result<()> {
    if requested() {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}
