//! `mesh-proxy wait`: returns once the proxy in this pod is ready, for the postStart hook that
//! `mesh-init inject --hold-application-until-proxy-starts` gives the sidecar (Istio's
//! `pilot-agent wait`). The kubelet starts a pod's containers in order and runs each postStart
//! hook to its end before starting the next container, so the application, placed after the
//! sidecar, starts only once the proxy answers `GET /ready` on its readiness port with 200.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use super::status;

/// Asks `127.0.0.1:<port>/ready` every `interval` until it answers 200, at most `timeout`.
pub async fn wait_ready(port: u16, timeout: Duration, interval: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let target = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    let mut last = String::from("not asked yet");
    while start.elapsed() < timeout {
        match status::get(target, "/ready", Some(target.ip()), &[], interval.max(Duration::from_secs(1))).await {
            Ok((code, _)) if code.is_success() => return Ok(start.elapsed()),
            Ok((code, body)) => last = format!("status {code}: {}", String::from_utf8_lossy(&body).trim()),
            Err(e) => last = e,
        }
        tokio::time::sleep(interval).await;
    }
    Err(format!("the proxy was not ready within {timeout:?} (last answer from {target}/ready: {last})"))
}
