//! Eventually-style waits: poll a condition until it holds, and say what was awaited when it
//! never does. Never a timed assertion: the limit only turns a hang into a failure.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::interrupt;

/// How often a condition is polled: often enough not to slow a test, rarely enough not to load
/// a shared machine.
const POLL: Duration = Duration::from_millis(20);

/// Polls `f` until it returns `Some`, and returns that; panics after `timeout` with "timed out
/// after … waiting for `what`". For tests.
#[track_caller]
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    match try_wait_until(timeout, what, || Ok(f())) {
        Ok(v) => v,
        Err(e) => panic!("{e:#}"),
    }
}

/// Polls `f` until it returns `Ok(Some)`. Fails at once when `f` fails (the server being waited
/// for has exited, say) or an interruption is requested, and after `timeout`. For the bench,
/// which reports failures rather than panicking.
pub fn try_wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        interrupt::check()?;
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// [`wait_until`] for tests on a tokio runtime: `f` returns a future, and the pause between polls
/// yields to the runtime instead of blocking one of its workers (the test's in-process servers
/// run there).
#[cfg(feature = "tokio")]
pub async fn wait_until_async<T, F>(timeout: Duration, what: &str, mut f: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}
