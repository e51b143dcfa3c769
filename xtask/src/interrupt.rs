//! Ctrl-C and SIGTERM: the handler only records the request; the harness checks it between steps
//! and while it waits for children, then returns an error, so every guard's `Drop` runs (the
//! default action would end the process with namespaces, cgroups and servers left behind).

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    REQUESTED.store(true, Ordering::SeqCst);
}

pub fn install() -> Result<()> {
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(())
}

pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Fails when an interruption was asked for, so the caller unwinds through its guards.
pub fn check() -> Result<()> {
    if requested() {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}
